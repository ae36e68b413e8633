"""The only part of the package that knows nnU-Net's internals: trainer, dataset hook, cache I/O, registration."""
