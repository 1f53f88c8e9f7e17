"""Running where detc is not: TVM RPC devices and trackers, qemu-user emulation, toolchains."""
