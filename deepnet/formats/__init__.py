"""On-disk formats: MNIST IDX files (``idx``) and the HDF5 model file (``hdf5``)."""
