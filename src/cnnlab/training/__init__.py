"""Training: the engine (`fit`), device and precision from capability checks, torchrun, the
frozen backbone's feature cache, fine_tune's prefix cache, and what a trained variant writes."""
