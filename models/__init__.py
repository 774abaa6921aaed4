"""Pure PyTorch model code: no distributed logic lives here."""
