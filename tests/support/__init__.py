"""Test helpers shared across test packages: a real Orthanc on loopback and a recording proxy."""
