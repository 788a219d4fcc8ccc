"""Networks: the from-scratch zoo (`zoo`) and the `Classifier` wrapper that is saved and served."""
