"""Small BatchNorm models trained on scikit-learn's digits data, shipped as bnfold test fixtures."""
