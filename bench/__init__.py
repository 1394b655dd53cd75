"""The benchmarks: scripts that measure the service on the machine they run on and write a record
under results/, and the parts they share (see README.md)."""
