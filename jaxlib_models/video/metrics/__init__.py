"""Video-editing metrics: warp errors, CLIP Pro-Ali / Tem-Con, stream FPS.

Every metric name carries its variant and model (flow estimator or CLIP
model); no pretrained flow or CLIP weights exist offline, so values obtained
here are not comparable to published ones.
"""

from jaxlib_models.video.metrics.clip_score import (
    RESIZE, CLIPModel, CLIPScore, clip_frame_consistency,
    clip_text_alignment, image_embeddings, load_clip_model, preprocess,
    text_embedding)
from jaxlib_models.video.metrics.timing import (StreamTiming,
                                                measure_stream_fps)
from jaxlib_models.video.metrics.warp_error import (
    WarpErrorResult, occlusion_squared, occlusion_streamv2v, warp_error_lai,
    warp_error_streamv2v, warp_errors)
