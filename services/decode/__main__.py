"""python -m services.decode --model DIR --rank R [--ep-size 1] [--redis-url URL] ..."""
import sys

from shared.runtime.engine_service import engine_main

from .decode_rank import DecodeService

if __name__ == "__main__":
    sys.exit(engine_main(DecodeService))
