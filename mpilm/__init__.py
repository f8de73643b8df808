"""mpilm: data-parallel language-model training over MPI with its own collectives.

Launch: ``mpirun -np N python -m mpilm.train`` (see ``mpilm/train.py``). This package file only
names the version; importing it does not start MPI.
"""

__version__ = "0.1.0"
