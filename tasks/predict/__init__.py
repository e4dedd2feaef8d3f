"""Prediction: listing images, batch prediction and serving requests."""
