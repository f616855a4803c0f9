//! Start order: dependencies before dependents, declaration order otherwise; cycles found.

/// Orders nodes `0..deps.len()` so that every node comes after the nodes it depends on
/// (`deps[i]` lists the nodes `i` depends on), keeping declaration order where the
/// dependencies allow. On a cycle, returns it as a path `a -> b -> ... -> a` (first node
/// repeated at the end), starting at the lowest-numbered node on it.
pub(crate) fn start_order(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks = vec![Mark::New; deps.len()];
    let mut order = Vec::with_capacity(deps.len());
    // Depth-first from each node in declaration order, with an explicit stack (a manifest
    // could be long and deep).
    for root in 0..deps.len() {
        if marks[root] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        marks[root] = Mark::Active;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = deps[node].get(*next) {
                *next += 1;
                match marks[dep] {
                    Mark::Done => {}
                    Mark::Active => {
                        let start = stack
                            .iter()
                            .position(|(n, _)| *n == dep)
                            .unwrap_or_default();
                        let mut cycle: Vec<usize> =
                            stack[start..].iter().map(|(n, _)| *n).collect();
                        let lowest = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, n)| **n)
                            .map_or(0, |(i, _)| i);
                        cycle.rotate_left(lowest);
                        cycle.push(cycle[0]);
                        return Err(cycle);
                    }
                    Mark::New => {
                        marks[dep] = Mark::Active;
                        stack.push((dep, 0));
                    }
                }
            } else {
                marks[node] = Mark::Done;
                order.push(node);
                stack.pop();
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn independent_nodes_keep_declaration_order() {
        assert_eq!(start_order(&[vec![], vec![], vec![]]), Ok(vec![0, 1, 2]));
    }

    #[test]
    fn dependencies_come_first() {
        // 0 needs 2, 1 needs 0: 2, 0, 1.
        assert_eq!(start_order(&[vec![2], vec![0], vec![]]), Ok(vec![2, 0, 1]));
    }

    #[test]
    fn diamonds_start_each_node_once() {
        // 0 needs 1 and 2; both need 3.
        let order = start_order(&[vec![1, 2], vec![3], vec![3], vec![]]).unwrap_or_default();
        assert_eq!(order, vec![3, 1, 2, 0]);
    }

    #[test]
    fn cycles_are_reported_as_paths() {
        assert_eq!(
            start_order(&[vec![1], vec![2], vec![0]]),
            Err(vec![0, 1, 2, 0])
        );
        assert_eq!(start_order(&[vec![], vec![2], vec![1]]), Err(vec![1, 2, 1]));
        assert_eq!(start_order(&[vec![0]]), Err(vec![0, 0]));
    }
}
