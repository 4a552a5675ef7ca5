"""Datasets: any folder of images becomes a clean, captioned, bucketed training set.

    ds = build_dataset(cfg, log=print)
    for batch in ds.epoch_batches(epoch): ...   # item indices, one bucket per batch
    ds.load_sample(index, epoch, position)      # pixels in [-1, 1] + SDXL size conditioning
    ds.caption_for(index, epoch, position)
"""
from .buckets import Bucketer, BucketSpec, CropInfo, make_buckets, resize_and_crop
from .cache import LatentCache, latent_cache_for
from .captions import CaptionOptions, process_caption, split_tags
from .dataset import Dataset, build_dataset
from .errors import DatasetError, ImageLoadError
from .fingerprint import difference_hash, file_digest
from .images import IMAGE_EXTENSIONS, load_image, parse_background, probe_image
from .report import DatasetReport, build_report, dataset_report, run_check
from .scan import ImageItem, ScanResult, scan_dataset

__all__ = [
    "build_dataset", "Dataset", "ImageItem", "DatasetError", "ImageLoadError",
    "LatentCache", "latent_cache_for",
    "DatasetReport", "build_report", "dataset_report", "run_check",
    "scan_dataset", "ScanResult", "IMAGE_EXTENSIONS", "load_image", "probe_image", "parse_background",
    "Bucketer", "BucketSpec", "CropInfo", "make_buckets", "resize_and_crop",
    "CaptionOptions", "process_caption", "split_tags", "difference_hash", "file_digest",
]
