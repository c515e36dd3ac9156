//! Hugepage pools (/sys/kernel/mm/hugepages, per NUMA node), /proc/meminfo and hugetlbfs mounts.
