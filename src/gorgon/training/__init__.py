"""Training data and training: self-distillation (`gorgon distill`), Magpie synthesis."""
