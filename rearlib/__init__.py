"""rearlib: a reproducible companion to reAR (arXiv 2510.04450) and VA-pi (arXiv 2512.19680).

Modules stay importable on their own; nothing heavy is imported here so that `import rearlib` is instant.
"""

__version__ = "0.1.0"
