//! Sizes parsed and printed the way QEMU does.
