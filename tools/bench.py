"""Benchmark fxpass side by side with vLLM's module walk and HF eager (see fxpass/bench.py)."""

from fxpass.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
