//! Readers for the host's /proc and /sys. Every reader takes a root path
//! (normally `/`) so that tests can run on fixture trees without root.

pub mod cpus;
pub mod hugepages;
pub mod mounts;
pub mod tasks;
pub mod threads;
