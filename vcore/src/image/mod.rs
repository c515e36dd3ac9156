//! Disk images: a block-device abstraction with raw and qcow2 backends.
