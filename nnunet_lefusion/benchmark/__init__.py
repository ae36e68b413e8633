"""Does synthesis help? Segmentation with and without synthetic cases, per case, with error bars."""
