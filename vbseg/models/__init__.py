"""NumPyro programs, one model family per module. Models say *what*; `vbseg.inference` says *how*."""
