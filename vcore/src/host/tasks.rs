//! Tasks (processes and threads) from /proc: names, state, last CPU, affinity.
