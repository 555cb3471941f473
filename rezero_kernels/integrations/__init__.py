"""Adapters to other libraries' models; each imports its library when it is itself imported
(``rezero_kernels`` never imports them)."""
