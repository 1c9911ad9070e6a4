"""Diffusion backbone: CLIP towers and tokenizer, samplers, weight conversion.

The UNet, autoencoders and ControlNet of issue 7 are not here yet.
"""

from jaxlib_models.diffusion.clip import (CLIP_MEAN, CLIP_STD,
                                          CLIPTextConfig, CLIPTextOutput,
                                          CLIPVisionConfig, CLIPVisionOutput,
                                          cosine_similarity, encode_image,
                                          encode_text, init_text_params,
                                          init_vision_params, normalize_image,
                                          sd15_text_config)
from jaxlib_models.diffusion.clip_tokenizer import CLIPTokenizer
from jaxlib_models.diffusion.convert import (ConversionError, load_clip_text,
                                             load_clip_vision,
                                             params_from_torch_state,
                                             path_to_torch_key,
                                             read_safetensors_folder,
                                             save_clip_text, save_clip_vision,
                                             torch_key_to_path,
                                             torch_state_from_params,
                                             write_safetensors)
from jaxlib_models.diffusion.schedulers import (
    DDIMConfig, DDIMSchedule, EulerConfig, EulerSchedule, LCMConfig,
    LCMSchedule, NoiseScheduleConfig, add_noise, ddim_set_timesteps,
    ddim_step, ddim_timesteps, euler_add_noise, euler_scale_model_input,
    euler_set_timesteps, euler_step, from_diffusers_config, get_velocity,
    lcm_denoise, lcm_origin_timesteps, lcm_scalings, lcm_set_timesteps,
    lcm_step, lcm_timesteps, make_alphas_cumprod, make_betas, predict_x0_eps,
    rescale_betas_zero_snr, stream_t_index_list)
