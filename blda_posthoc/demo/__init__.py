"""The embedded demo: the synthetic benchmark's files and the shipped demo network."""
