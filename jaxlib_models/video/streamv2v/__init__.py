"""StreamV2V: streaming video-to-video with a feature bank (arXiv 2405.15757).

`stream` holds the stream-batch LCM step and its settings, `bank` the
feature bank (extended attention inputs, dynamic merging).
"""

from jaxlib_models.video.streamv2v.bank import (bank_bytes, bipartite_assign,
                                                merge_assigned, merge_layer,
                                                seed_bank, update_bank)
from jaxlib_models.video.streamv2v.stream import (BankConfig, StreamConfig,
                                                  StreamState, init_state,
                                                  make_step, unet_denoiser)
