"""Optical flow for the video methods: bilinear warping and estimators."""

from jaxlib_models.video.flow.estimators import (FLOW_ESTIMATORS, DISFlow,
                                                 FarnebackFlow, FlowEstimator,
                                                 GroundTruthFlow,
                                                 compute_flows,
                                                 get_flow_estimator)
from jaxlib_models.video.flow.warp import (backward_warp, bilinear_sample,
                                           flow_to_grid, grid_sample,
                                           pixel_to_grid)
