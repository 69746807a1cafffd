"""The evaluate stage: reconstruction metrics and the spliced downstream loss."""
