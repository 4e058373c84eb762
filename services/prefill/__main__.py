"""python -m services.prefill --model DIR --rank R [--ep-size 1] [--redis-url URL] ..."""
import sys

from shared.runtime.engine_service import engine_main

from .prefill_rank import PrefillService

if __name__ == "__main__":
    sys.exit(engine_main(PrefillService))
