"""The jobs main.py runs (run, serve, finetune, verify, verify_large; entry picks one), each a module or a
folder of its own, and what they share (common/: the one build path, devices, host memory). Never imported by
the library."""
