"""`python -m cnnlab predict | doctor`."""
