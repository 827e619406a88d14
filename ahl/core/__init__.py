"""The ground floor: configuration checks, atomic IO, provenance, the runtime (device and numerics), console,
errors, process groups."""
