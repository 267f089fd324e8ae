// Baseline attention kernels: filled in by bench work.
