//! vcore: the VMM engine (KVM VM and vCPUs, guest memory, CPUID, Linux boot,
//! devices) and the building blocks the tools share (image formats, CPU lists,
//! sizes, /proc and /sys readers).

pub mod boot;
pub mod cpuid;
pub mod cpulist;
pub mod devices;
pub mod host;
pub mod hostcheck;
pub mod image;
pub mod monitor;
pub mod net;
pub mod qemuopts;
pub mod units;
pub mod vm;
