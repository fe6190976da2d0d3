"""Test tiers: `pytest -m "not slow"` is the fast tier (every module, a few minutes on 2 CPU
cores); CI runs everything.

SLOW names the tests that take more than about 2.5 s on that CPU (measured with
`pytest --durations=0`; a module fixture's cost counts toward the test that first uses it):
training for more than a few steps, end-to-end runs of a command, the GPU suite's tiny run, two
processes. Each module keeps at least one fast test.
"""

import pytest

# Modules whose every test shares one expensive fixture (a training run on 8 devices).
SLOW_MODULES = ("test_fsdp.py",)
# test module -> the tests (their ids, parameters included) of the slow tier
SLOW = {
    "test_init_codes.py": (
        "test_run_resumes_bit_identical_and_evaluate_reads_the_teacher",
    ),
    "test_pretrain.py": (
        "test_pretraining_learns_and_saves_a_loadable_teacher",
    ),
    "test_tokenize.py": (
        "test_each_process_reads_only_its_shards_and_feeds_its_devices_rows",
        "test_an_interrupted_run_resumes_and_ends_the_same",
    ),
    "test_attention.py": (
        "test_google_maskgit_and_meissonic_agree_across_kernels",
        "test_maskgit_logits_and_gradients_agree_across_kernels[bfloat16-0.15]",
        "test_maskgit_logits_and_gradients_agree_across_kernels[float32-2e-05]",
        "test_the_meissonic_sequence_lowers_to_cudnn",
    ),
    "test_convert_fid_inception.py": (
        "test_description",
        "test_matches_reference[shape0]",
        "test_matches_reference[shape1]",
    ),
    "test_convert_google_maskgit.py": (
        "test_one_distillation_step_is_finite",
    ),
    "test_convert_halton_maskgit.py": (
        "test_distillation_starts_from_a_converted_teacher",
    ),
    "test_digit_prompts.py": (
        "test_pretraining_step_feeds_each_digit_its_prompt_and_drops_to_the_empty_one",
        "test_pretraining_writes_a_text_teacher_that_reads_its_prompts",
    ),
    "test_distill_step.py": (
        "test_gradient_accumulation_is_the_mean_of_the_micro_batch_gradients",
        "test_the_auxiliary_gradients_are_not_clipped_unless_asked",
    ),
    "test_evaluate.py": (
        "test_the_run_evaluator_gives_the_fid_of_evaluate",
        "test_on_eight_devices_the_run_evaluator_gives_the_fid_of_evaluate",
        "test_a_run_scores_its_evaluations_on_schedule_into_tensorboard",
        "test_eight_devices_give_the_features_of_one",
        "test_evaluate_seeds_flag_reports_the_mean_over_seeds",
        "test_fid_inception_features_with_random_weights",
        "test_image_evaluation_scores_the_images_it_saves",
        "test_stats_from_a_tfds_dataset",
        "test_the_generator_is_evaluated_at_each_gen_temp",
        "test_toy_cli_writes_results_samples_and_the_table",
    ),
    "test_evaluate_text.py": (
        "test_the_clip_reward_is_the_unclamped_clip_score_of_the_decoded_soft_codes",
        "test_generator_samples_are_the_one_step_sampler_of_the_ema",
        "test_a_text_run_reads_its_teacher_and_vqvae_once",
        "test_cli_on_eight_devices_gives_the_samples_of_one",
        "test_clip_score_is_that_of_the_saved_images_and_prompts",
        "test_teacher_over_a_prompt_file_is_the_release_sampler",
        "test_the_in_run_teacher_is_the_one_evaluate_samples",
    ),
    "test_fsdp.py": (
        "test_every_mesh_trains_as_one_device",
    ),
    "test_gan.py": (
        "test_the_diversity_term_is_added_to_the_generator_loss",
        "test_a_gan_step_updates_the_heads_and_never_the_teacher",
        "test_a_gan_step_without_real_data_is_refused",
        "test_dimo_alone_keeps_no_discriminator",
        "test_resume_is_bit_identical_with_the_gan",
        "test_the_discriminator_loss_reaches_neither_theta_nor_the_teacher",
        "test_the_gan_term_reaches_theta_through_the_frozen_backbone",
    ),
    "test_image_rewards.py": (
        "test_the_inception_reward_is_the_log_probability_of_the_mapped_class",
    ),
    "test_text_soft_dimo.py": (
        "test_a_text_run_with_the_gan_and_the_reward_trains_and_evaluates",
        "test_the_text_reward_reads_the_digit_the_prompt_names",
    ),
    "test_gpu_suite.py": (
        "test_the_table_and_log_come_back_under_out",
        "test_every_section_reports_at_toy_size_without_tensorflow_or_clu",
        "test_the_model_flops_are_what_xla_counts",
        "test_the_shell_wrapper_runs_the_suite_into_out",
    ),
    "test_maskbit.py": (
        "test_the_rewards_soft_pictures_read_sub_token_distributions_as_bits[postnorm-token_emb]",
        "test_the_rewards_soft_pictures_read_sub_token_distributions_as_bits[prenorm-input_proj]",
        "test_real_imagenet_tokens_are_the_teachers_sub_tokens",
        "test_sample_draws_a_maskbit_teacher_through_its_tokenizer[prenorm-input_proj]",
        "test_a_maskbit_teacher_pretrains_and_distills_end_to_end",
        "test_sample_draws_a_maskbit_teacher_through_its_tokenizer[postnorm-token_emb]",
    ),
    "test_meissonic_transformer.py": (
        "test_noise_formula",
        "test_emb_noise",
        "test_logits_match_reference[plain]",
        "test_logits_match_reference[release_like]",
        "test_remat_and_bfloat16",
    ),
    "test_memory_estimate.py": (
        "test_real_size_script",
    ),
    "test_multiprocess.py": (
        "test_two_processes_with_a_resume_match_one",
    ),
    "test_precision.py": (
        "test_remat_keeps_parameters_and_gradients[maskgit]",
        "test_remat_keeps_parameters_and_gradients[google-maskgit]",
        "test_remat_step_matches_and_bf16_teacher_halves_its_bytes",
    ),
    "test_reliability_cli.py": (
        "test_every_user_error_of_evaluate_is_one_line[missing checkpoint]",
        "test_sample_names_a_damaged_step_and_what_to_do[truncated arrays]",
        "test_sample_names_a_damaged_step_and_what_to_do[truncated manifest]",
        "test_sample_names_a_damaged_step_and_what_to_do[truncated metadata]",
        "test_sample_refuses_a_tokenizer_of_another_codebook",
        "test_sample_replaces_its_own_png_and_a_file_only_with_overwrite",
    ),
    "test_reliability_converters.py": (
        "test_two_conversions_at_once_one_writes_the_other_is_refused",
    ),
    "test_reliability_modeldirs.py": (
        "test_a_part_outside_the_directory_is_refused[absolute-tokenizer]",
        "test_the_directories_load",
    ),
    "test_reliability_training.py": (
        "test_a_checkpoint_that_meets_a_full_disk_is_one_line",
        "test_flipped_bytes_in_a_checkpoint_are_named_not_loaded",
        "test_another_teacher_at_the_same_path_is_refused",
        "test_a_failed_first_attempt_does_not_bind_the_corrected_run",
        "test_an_update_that_overflows_is_skipped",
        "test_mesh_and_mask_errors_are_one_line_before_any_compile[num_devices]",
        "test_mesh_and_mask_errors_are_one_line_before_any_compile[mask_value]",
        "test_the_same_teacher_by_another_path_resumes",
        "test_steps_without_their_record_are_not_resumed_silently",
        "test_a_damaged_latest_checkpoint_names_the_step_to_delete",
        "test_a_deliberate_change_is_allowed_and_the_old_record_kept",
        "test_a_finished_run_relaunched_with_a_bad_value_writes_nothing",
        "test_a_nan_teacher_stops_the_run",
        "test_a_record_that_is_not_json_is_named",
        "test_a_resume_with_another_teacher_is_refused",
        "test_a_resume_with_other_method_keys_is_refused_and_the_record_kept[change0]",
        "test_a_resume_with_other_method_keys_is_refused_and_the_record_kept[change1]",
        "test_a_resume_with_other_method_keys_is_refused_and_the_record_kept[change2]",
        "test_a_resume_with_other_method_keys_is_refused_and_the_record_kept[change3]",
        "test_a_resume_with_other_method_keys_is_refused_and_the_record_kept[change4]",
        "test_a_run_whose_updates_all_overflow_stops_with_an_error",
        "test_a_second_run_on_a_held_workdir_is_refused",
        "test_run_length_and_logging_may_change_on_resume",
        "test_the_lock_is_released_when_its_holder_dies",
        "test_the_record_is_written_only_after_the_restore",
        "test_zero_disables_the_stop",
    ),
    "test_rewards.py": (
        "test_the_reward_term_reaches_the_generator_logits",
        "test_a_reward_step_logs_the_reward",
        "test_the_reward_classifier_is_not_the_scorer_and_reads_digits",
        "test_tteo_raises_the_reward_of_the_generator",
    ),
    "test_sample_cli.py": (
        "test_tteo_changes_the_generator_grid_with_the_runs_reward",
        "test_teacher_grid_has_a_row_per_label",
    ),
    "test_sampling.py": (
        "test_generator_sample",
    ),
    "test_soft.py": (
        "test_tokenizers_decode_soft_codes[taming-vqgan]",
        "test_every_layer_is_sown_for_the_discriminator[meissonic]",
        "test_one_hot_soft_tokens_equal_the_int_forward[google-maskgit]",
        "test_a_mixture_embeds_the_mixture_of_embeddings[meissonic]",
        "test_a_mixture_embeds_the_mixture_of_embeddings[maskbit]",
        "test_one_hot_soft_tokens_equal_the_int_forward[maskbit]",
        "test_one_hot_soft_tokens_equal_the_int_forward[maskgit]",
        "test_one_hot_soft_tokens_equal_the_int_forward[meissonic]",
    ),
    "test_teacher_contract.py": (
        "test_a_module_becomes_the_teacher_of_its_kind[meissonic]",
    ),
    "test_text_distill.py": (
        "test_accumulated_micro_batches_each_read_their_own_prompts",
        "test_teacher_guidance_uses_the_negative_prompt",
        "test_text_step_trains_the_generator_and_keeps_frozen_layers",
    ),
    "test_text_to_image.py": (
        "test_conditioned_adapter_takes_the_negative_prompt_when_dropped",
        "test_logits_are_the_transformer_with_the_release_mask_id[7.0]",
        "test_logits_are_the_transformer_with_the_release_mask_id[0.0]",
        "test_sample_cli_generator_grid",
    ),
    "test_text_train.py": (
        "test_image_caption_pairs_are_a_text_runs_real_data",
        "test_a_text_run_trains_samples_and_checkpoints",
    ),
    "test_train.py": (
        "test_checkpoints_keep_the_limit_and_the_config",
        "test_eight_devices_match_one",
        "test_main_writes_metrics_samples_and_checkpoints",
        "test_resume_is_bit_identical",
    ),
    "test_writers.py": (
        "test_a_run_writes_window_means_a_profile_and_its_final_metrics",
        "test_a_run_with_the_wandb_writer_logs_its_scalars_offline",
        "test_a_run_imports_no_tensorflow",
    ),
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    name = item.nodeid.split("::", 1)[-1]
    if module in SLOW_MODULES or name in SLOW.get(module, ()):
      item.add_marker(pytest.mark.slow)
