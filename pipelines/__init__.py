"""deeplab-ray pipelines: storage, data ingestion, training, batch segmentation and promotion."""
