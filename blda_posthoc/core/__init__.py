"""The numeric core: arrays and tensors in, arrays and tensors out; no paths, no HDF5, no click."""
