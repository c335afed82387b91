"""Evaluation: perplexity and zero-shot tasks on local data, with one JSON result record per run.

- ``perplexity.perplexity(model, tokenizer, data, window=, batch_size=, limit_windows=)``: standard protocol
- ``zeroshot.zeroshot(model, tokenizer, tasks, limit=)``: lm-eval's log-likelihood protocol, local task files
- ``run.evaluate(model_dir, recipe, results_dir=, extra=, device=)``: both, as one record (``run.evaluate_loaded``
  for an already-loaded model)
- ``records.load_records(dir)``: every record as one pandas DataFrame
- ``recipe.EvalRecipe``: what to evaluate (``kind: eval``)
"""
