# mpilm: `make train` and `make test` are all a fresh machine needs (they create .venv first).
# Overridable: PYTHON, VENV, TORCH (pin; unpinned torch pulls a multi-GB CUDA build), MPICH
# (set MPICH= to use a system MPI: mpi4py is then built against $(MPICC), the mpicc on PATH unless
# set), NP, ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MPICH ?= mpich
MPICC ?= mpicc
NP ?= 2
ARGS ?=
TIMEOUT ?= 900
BIN := $(VENV)/bin
MPIRUN := timeout --signal=TERM --kill-after=10 $(TIMEOUT) $(BIN)/mpirun
# ranks the distributed tests run at; the collectives also run at 1, 4 and 5
TEST_NPS ?= 2 3
COLLECTIVE_NPS ?= 1 4 5

.PHONY: install train test test-serial test-mpi test-multinode test-system bench kernels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(if $(MPICH),$(BIN)/pip install -q $(MPICH),env MPICC=$(MPICC) $(BIN)/pip install -q --no-binary mpi4py mpi4py)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

train: install
	$(MPIRUN) -np $(NP) $(BIN)/python -m mpilm.train $(ARGS)

test: install test-serial test-mpi test-multinode

test-serial: install
	timeout $(TIMEOUT) $(BIN)/python -m pytest -q -m "not system" tests

# the whole-system scenarios, kept out of `make test` so it stays under 10 minutes (CI runs both,
# .ci/run): faults on the emulated cluster (stopped nodes, dead links, bench chaos), a disk filling
# up on a real tmpfs, the PBS script's pre-empt/resubmit flow, the GPU check's dry run; those that
# need root skip with the reason otherwise. About 2 minutes here.
test-system: install
	timeout $(TIMEOUT) $(BIN)/python -m pytest -q -m system tests

test-mpi: install
	set -e; for n in $(TEST_NPS); do \
	  echo "== distributed tests at -np $$n"; \
	  $(MPIRUN) -np $$n $(BIN)/python -m pytest -q --with-mpi -m "mpi and not multinode" tests; \
	done
	set -e; for n in $(COLLECTIVE_NPS); do \
	  echo "== collective tests at -np $$n"; \
	  $(MPIRUN) -np $$n $(BIN)/python -m pytest -q --with-mpi -m "mpi and collectives" tests; \
	done

# the distributed suites again on real emulated nodes (python -m mpilm.cluster: network namespaces,
# 10gbit links), at 2 nodes x 1 rank and 2 nodes x 2 ranks; needs root, skipped with the reason
# otherwise; the cluster (named mpilmci) is removed also when a test fails
MULTINODE_TESTS ?= tests/test_multinode.py tests/test_collectives.py tests/test_halves.py tests/test_compress.py \
	tests/test_train.py::test_data_parallel_equals_one_process_with_the_global_batch \
	tests/test_engine.py::test_overlap_on_and_off_give_bit_identical_parameters \
	tests/test_engine.py::test_zero1_matches_the_unsharded_optimizer \
	tests/test_modes.py::test_local_sgd_with_one_step_equals_sync_and_diloco_with_one_plain_outer_step_equals_local \
	tests/test_modes.py::test_async_ends_with_the_servers_model_on_every_rank_and_resumes_from_its_checkpoints
CLUSTER := env MPILM_CLUSTER=mpilmci $(BIN)/python -m mpilm.cluster
test-multinode: install
	@if [ "$$(id -u)" != 0 ]; then echo "== multi-node tests skipped: python -m mpilm.cluster needs root"; exit 0; fi; \
	set -e; trap '$(CLUSTER) down >/dev/null' EXIT; \
	for ppn in 1 2; do \
	  echo "== multi-node tests: 2 nodes x $$ppn rank(s)"; \
	  $(CLUSTER) up --nodes 2 --link 10gbit --slots-per-node $$ppn >/dev/null; \
	  timeout --signal=TERM --kill-after=10 $(TIMEOUT) $(CLUSTER) run --ppn $$ppn -- \
	    $(BIN)/python -m pytest -q --with-mpi -m mpi $(MULTINODE_TESTS); \
	done

# the batch scripts of batch/ under a real Slurm on this machine (tests/test_slurm.py through
# tests/local_slurm.py): Debian's slurm-wlm and munge installed when missing, munged, slurmctld and
# slurmd started from a configuration generated in a temp dir (one node, state and spool there),
# every daemon stopped by pid at the end, also when a check fails or the timeout's SIGTERM comes;
# about 2 minutes; needs root, skipped with the reason otherwise
.PHONY: test-slurm
test-slurm: install
	@if [ "$$(id -u)" != 0 ]; then echo "== Slurm tests skipped: they install slurm-wlm and run its daemons as root"; exit 0; fi; \
	echo "== Slurm tests: the batch scripts under a local slurmctld + slurmd"; \
	MPILM_SLURM_TESTS=1 timeout --signal=TERM --kill-after=30 300 $(BIN)/python -m pytest -q tests/test_slurm.py

bench: install
	$(MPIRUN) -np $(NP) $(BIN)/python -m mpilm.bench allreduce $(ARGS)

# compression and shared-memory allreduce kernels (C++, plus CUDA when torch sees a GPU) built
# ahead of time into the cache; without this the first use JIT-builds them (~40 s); exits 1 when
# they cannot be built
kernels: install
	$(BIN)/python -m mpilm.kernels

# the GPU path on a GPU machine, in one script of at most 8 minutes (tools/gpu-check.sh): the CUDA
# kernels built with nvcc, tests/gpu at -np 2, bench allreduce on CUDA buffers at -np 1 and 2, and a
# 200-step bf16 run of an 85M-parameter GPT on one GPU; every table, JSON and PNG in $(OUT) when
# set, else runs/gpu-check. DRY=1: the same stages on the CPU at toy sizes (no GPU needed)
DRY ?= 0
.PHONY: gpu-check
gpu-check: install
	DRY=$(DRY) VENV=$(VENV) tools/gpu-check.sh $(or $(OUT),runs/gpu-check)

# the distributed tests at -np 2 under Open MPI, the MPI most clusters run, instead of the wheel's
# MPICH: Debian's openmpi-bin and libopenmpi-dev are installed when missing (apt-get, as root), and
# `make install` builds mpi4py against Open MPI's mpicc into its own venv, $(OMPI_VENV) (torch as
# pinned by TORCH); .venv is not touched. As root (containers, CI) Open MPI's mpirun refuses to start
# without --allow-run-as-root, and refuses more ranks than the cores it counts without
# --oversubscribe, so both are passed then (and only then): OMPI_ROOT_FLAGS, printed with the command.
OMPI_VENV ?= .venv-ompi
OMPI_MPICC ?= mpicc.openmpi
OMPI_MPIRUN ?= mpirun.openmpi
OMPI_ROOT_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-run-as-root --oversubscribe)
.PHONY: test-system-mpi
test-system-mpi:
	@if ! command -v $(OMPI_MPICC) >/dev/null || ! command -v $(OMPI_MPIRUN) >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then echo "error: Open MPI ($(OMPI_MPIRUN), $(OMPI_MPICC)) is not installed; as root: apt-get install openmpi-bin libopenmpi-dev" >&2; exit 2; fi; \
	  echo "== installing Debian's Open MPI (openmpi-bin, libopenmpi-dev)"; \
	  apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
	    install --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null; \
	fi
	$(MAKE) --no-print-directory install VENV=$(OMPI_VENV) MPICH= MPICC=$(OMPI_MPICC)
	@$(OMPI_VENV)/bin/python -c "from mpi4py import MPI; print('==', MPI.Get_library_version().splitlines()[0])"
	@echo "== distributed tests at -np 2 under Open MPI's $(OMPI_MPIRUN) $(OMPI_ROOT_FLAGS)"
	timeout --signal=TERM --kill-after=10 $(TIMEOUT) $(OMPI_MPIRUN) $(OMPI_ROOT_FLAGS) -np 2 \
	  $(OMPI_VENV)/bin/python -m pytest -q --with-mpi -m "mpi and not multinode" tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
