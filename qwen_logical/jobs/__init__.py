"""The jobs main.py runs (run, verify): config -> one build path -> the library. Never imported by it."""
