# Test data: the "Plot Training Curves" snippet of the exp10 ablation's README, section
# "Analysis Tools" (Open-Superintelligence-Lab/blueberry-llm,
# experiments/exp10_attention_mechanism_ablation/README.md), kept exactly as written there.
# tests/test_report.py runs it against a report's results/ view (plt.show is a no-op under Agg).
import json
import matplotlib.pyplot as plt

mechanisms = ['mha', 'gqa_2', 'mqa', 'linear']
for mech in mechanisms:
    with open(f'experiments/exp10_attention_mechanism_ablation/results/{mech}/metrics.json') as f:
        data = json.load(f)
    plt.plot(data['train_steps'], data['train_loss'], label=mech)

plt.xlabel('Training Steps')
plt.ylabel('Training Loss')
plt.legend()
plt.title('Training Loss Comparison')
plt.show()
