"""Data: fetching and preparing datasets, and the tensor loaders."""
