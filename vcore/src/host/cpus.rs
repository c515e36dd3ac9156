//! Online, isolated and nohz_full CPUs, SMT siblings and NUMA nodes from /sys.
