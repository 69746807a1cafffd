"""The baseline and evaluate stages: the model-only ablations, the SAE's reconstruction metrics, and
the spliced downstream loss."""
