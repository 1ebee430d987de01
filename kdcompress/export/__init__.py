"""Export artifacts: compressed files of a trained model, and loading them back."""
