"""python -m services.decode --model DIR --rank R [--ep-size 1] [--redis-url URL] ..."""
import sys

from shared.runtime.worker import worker_main

from .worker import DecodeService

if __name__ == "__main__":
    sys.exit(worker_main(DecodeService))
