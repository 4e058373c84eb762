"""python -m services.prefill --model DIR --rank R [--ep-size 1] [--redis-url URL] ..."""
import sys

from shared.runtime.worker import worker_main

from .worker import PrefillService

if __name__ == "__main__":
    sys.exit(worker_main(PrefillService))
