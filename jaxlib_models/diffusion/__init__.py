"""Diffusion backbone (brief video_editing.md §2.1-2.2): SD-1.5 UNet (4/8
channels), ControlNet, AutoencoderKL, TAESD, CLIP towers and tokenizer,
schedulers, the shared attention primitive, and weight loading (diffusers
folders, single files, LoRA fusing, converted-params cache).

Submodules are imported explicitly (`from jaxlib_models.diffusion import
unet`); the names below are the most used entry points.
"""

from jaxlib_models.diffusion.attention import (SelfAttnHooks, attend,
                                               fuse_features)
from jaxlib_models.diffusion.cache import cached_params
from jaxlib_models.diffusion.clip import (CLIP_MEAN, CLIP_STD,
                                          CLIPTextConfig, CLIPTextOutput,
                                          CLIPVisionConfig, CLIPVisionOutput,
                                          cosine_similarity, encode_image,
                                          encode_text, init_text_params,
                                          init_vision_params, normalize_image,
                                          sd15_text_config)
from jaxlib_models.diffusion.clip_tokenizer import CLIPTokenizer
from jaxlib_models.diffusion.controlnet import (ControlNetConfig,
                                                ControlNetModel,
                                                init_controlnet_params)
from jaxlib_models.diffusion.convert import (ConversionError, load_clip_text,
                                             load_clip_vision,
                                             params_from_torch_state,
                                             path_to_torch_key,
                                             read_safetensors_folder,
                                             save_clip_text, save_clip_vision,
                                             torch_key_to_path,
                                             torch_state_from_params,
                                             write_safetensors)
from jaxlib_models.diffusion.loaders import (SDComponents, default_tokenizer,
                                             load_controlnet, load_sd_folder,
                                             load_single_file, load_taesd,
                                             load_text_encoder, load_unet,
                                             load_vae)
from jaxlib_models.diffusion.lora import LoRAError, fuse_lora, read_lora
from jaxlib_models.diffusion.schedulers import (
    DDIMConfig, DDIMSchedule, EulerConfig, EulerSchedule, LCMConfig,
    LCMSchedule, NoiseScheduleConfig, add_noise, ddim_set_timesteps,
    ddim_step, ddim_timesteps, euler_add_noise, euler_scale_model_input,
    euler_set_timesteps, euler_step, from_diffusers_config, get_velocity,
    lcm_denoise, lcm_origin_timesteps, lcm_scalings, lcm_set_timesteps,
    lcm_step, lcm_timesteps, make_alphas_cumprod, make_betas, predict_x0_eps,
    rescale_betas_zero_snr, stream_t_index_list)
from jaxlib_models.diffusion.single_file import (
    ldm_checkpoint_from_components, read_single_file, split_ldm_checkpoint)
from jaxlib_models.diffusion.taesd import (AutoencoderTiny, TAESDConfig,
                                           init_taesd_params)
from jaxlib_models.diffusion.unet import (UNet2DConditionModel, UNetConfig,
                                          init_unet_params, sd15_unet_config)
from jaxlib_models.diffusion.vae import (AutoencoderKL, VAEConfig,
                                         init_vae_params)
