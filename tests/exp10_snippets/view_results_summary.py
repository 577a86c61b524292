# Test data: the "View Results Summary" snippet of the exp10 ablation's README, section
# "Analysis Tools" (Open-Superintelligence-Lab/blueberry-llm,
# experiments/exp10_attention_mechanism_ablation/README.md), kept exactly as written there.
# tests/test_report.py runs it against a report's results/ view.
import json

with open('experiments/exp10_attention_mechanism_ablation/results/comprehensive_results.json') as f:
    results = json.load(f)

# Print ranking
sorted_results = sorted(results.items(), key=lambda x: x[1]['final_loss'])
for rank, (name, metrics) in enumerate(sorted_results, 1):
    print(f"{rank}. {name}: Loss {metrics['final_loss']:.4f}, PPL {metrics['final_perplexity']:.2f}")
