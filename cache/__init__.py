"""The HDF5 feature cache: its format, writer and reader. The only code that knows HDF5 paths."""
