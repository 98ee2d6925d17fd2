# embervm — see README.md. Every target installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-kvm test-e2e fuzz bench bench-quick lint cov guest rootfs clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# A real Firecracker client for the compatibility tests.  It declares Python >= 3.12 but
	# runs on 3.11; its one dependency (requests-unixsocket) is pinned in the dev extras.
	$(BIN)/pip install -q --no-deps --ignore-requires-python pyrecracker==0.6.4
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/embervm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-kvm: $(STAMP)
	$(BIN)/python -m pytest -q tests/kvm

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

cov: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit --cov=embervm.devices.virtio --cov-report=term-missing

fuzz: $(STAMP)
	$(BIN)/python -m embervm.testing.fuzz --examples $${EXAMPLES:-1000000}

# embervm side by side with QEMU microvm and a raw C KVM exit loop (docs/PERFORMANCE.md): ~12 min.
# Installs qemu-system-x86 and gcc with apt-get when missing (as root); results in out/bench/.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/virtqueue_bench.py

# One run of each, shorter tests: ~2 min, for development (numbers need the full run).
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench.py --quick

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# Rebuild the embedded guest from guest/ (Debian linux-source-6.1; ~11 min on 2 cores).
guest:
	guest/build.sh --install-deps out/guest
	xz -9 -T2 -c out/guest/vmlinux-full > src/embervm/guest/vmlinux-full.xz
	xz -9 -T2 -c out/guest/vmlinux-base > src/embervm/guest/vmlinux-base.xz
	xz -9 -T2 -c out/guest/initramfs-busybox.cpio > src/embervm/guest/initramfs-busybox.cpio.xz
	cp out/guest/initramfs-tiny.cpio.gz src/embervm/guest/
	cd src/embervm/guest && sha256sum *.xz *.gz > SHA256SUMS

# The busybox userland as a 64 MiB ext4 root filesystem, out/rootfs.ext4: boot it with the full
# kernel, no initrd, "root=/dev/vda rw".  Installs e2fsprogs, cpio and xz with apt-get when
# missing (as root).
rootfs:
	guest/rootfs/build-rootfs.sh --install-deps out/rootfs.ext4

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .coverage
