"""Data: MedMNIST files, partitions across hospitals, and the plain values they produce."""
